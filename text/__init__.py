"""Text conditioning: frozen text encoders and the captions they encode."""
