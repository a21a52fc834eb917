"""One module per source format, each a `Reader` (see base.py); `READERS` names them all."""
