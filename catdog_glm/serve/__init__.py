"""Front ends: web pages and HTTP APIs over the library. No model logic lives here."""
