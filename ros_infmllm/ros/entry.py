"""The one way our executables run a node: init, build (exit 2 on bad configuration), spin,
shut down in ``finally``."""
from __future__ import annotations

from typing import Callable

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node


def run_node(build: Callable[[], Node], name: str, config_errors: tuple[type[BaseException], ...],
             args: list[str] | None = None) -> int:
    """Spin the node ``build()`` returns until shutdown; 2 when building it raises a config error."""
    rclpy.init(args=args)
    try:
        node = build()
    except config_errors as exc:
        rclpy.logging.get_logger(name).fatal(f"cannot start: {exc}")
        rclpy.try_shutdown()
        return 2
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
