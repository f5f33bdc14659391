"""Plot helpers draw Traditional Chinese titles when a CJK font is installed."""

import warnings

import matplotlib
import pytest
from matplotlib import font_manager

matplotlib.use("Agg")

from course_utils import plots  # noqa: E402

HAS_CJK_FILE = any("CJK" in path or "NotoSansTC" in path for path in font_manager.findSystemFonts())


@pytest.mark.skipif(not HAS_CJK_FILE, reason="no CJK font installed (the CI script installs fonts-noto-cjk)")
def test_chinese_title_has_glyphs(tmp_path):
    figure = plots.plot_curves({"loss": [3.0, 2.0, 1.0]}, title="訓練損失").figure
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Matplotlib reports a missing glyph as a UserWarning.
        figure.savefig(tmp_path / "curve.png")


@pytest.mark.skipif(not HAS_CJK_FILE, reason="no CJK font installed (the CI script installs fonts-noto-cjk)")
def test_installed_cjk_font_is_registered():
    registered_names = {font.name for font in font_manager.fontManager.ttflist}
    assert registered_names & set(plots.CJK_FONTS)


def test_drawable_text_replaces_emoji():
    assert plots.drawable_text("a \U0001f31f b\ufffd") == "a \u25a1 b\u25a1"
    assert plots.drawable_text("紅色 circle") == "紅色 circle"


@pytest.mark.skipif(not HAS_CJK_FILE, reason="no CJK font installed (the CI script installs fonts-noto-cjk)")
def test_emoji_titles_draw_without_warning(tmp_path):
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Matplotlib reports a missing glyph as a UserWarning, at layout or save.
        figure = plots.show_images([Image.new("RGB", (8, 8))], ["glowing star \U0001f31f\ufffd 星星"])
        figure.savefig(tmp_path / "grid.png")
