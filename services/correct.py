"""Correct stages: fix parts of images (face restoration). The service runs and describes an
empty catalog until the face-restoration stages land."""
