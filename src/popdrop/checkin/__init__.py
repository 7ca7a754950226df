"""QR tickets, offline-verifiable secrets, scans and visits."""
