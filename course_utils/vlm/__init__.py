"""Reference implementations of the course, one concept per module.

Later notebooks import what earlier ones built, for example ``from course_utils.vlm.clip
import clip_loss``. Each module is named after the part it contains (``clip``, ``text``,
``attention``, ``qformer``, ``llava``).
"""
