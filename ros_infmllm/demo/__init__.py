"""The synthetic camera world, its questions and the demo model trained on it (no ROS)."""
