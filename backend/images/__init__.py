"""Task images: fetching them within the SSRF and path policy."""
