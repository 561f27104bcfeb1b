"""MedAsk inference service. Importing the package imports nothing heavy."""
