"""Helper package of the course "vision-language models from scratch".

Later notebooks import what earlier ones built: the reference implementations live in
``course_utils.vlm``, the exercise checkers in ``course_utils.checks``.
"""

from course_utils.env import CourseEnv, get_device, get_profile, seed_everything, setup

__version__ = "0.1.0"

__all__ = ["CourseEnv", "get_device", "get_profile", "seed_everything", "setup", "__version__"]
