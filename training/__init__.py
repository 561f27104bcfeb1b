"""MedAsk offline training pipeline: MedText -> SFT -> DPO -> GPTQ -> checkpoint."""
