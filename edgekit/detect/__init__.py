"""Object detection: data, models, training and scoring for detectors."""
