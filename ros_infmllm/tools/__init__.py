"""Command-line tools: bag player and bag generator (work where `ros2 bag` is missing)."""
