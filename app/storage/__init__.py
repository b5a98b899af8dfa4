"""The model store: atomic and capped file IO, the manifest and extractor entry, the head tree (versions,
``current``, examples, jobs, spool) and its one owner, typed cards, the safe head format, the control
plane. Imports only :mod:`app.core`."""
