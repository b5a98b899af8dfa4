"""The web console's static files (HTML, CSS, one small JS module per feature), served by ``app/api/console.py``."""
