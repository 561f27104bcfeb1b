"""The clinicians' page: one HTML file, one script and one style sheet, served by the app itself
(app/api/routes/page.py) with no external resource. No build step: what is here is what the browser gets."""
