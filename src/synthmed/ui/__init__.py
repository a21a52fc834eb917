"""`synthmed ui`: a local web app over one trained model (`session.py` does the work, `app.py` draws the page)."""
