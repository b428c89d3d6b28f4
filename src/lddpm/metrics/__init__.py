"""FID, Inception-style score, class accuracy, precision/recall."""
