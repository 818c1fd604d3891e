import pytest

from megatron_mesh.recurrence.layout import parse_layout


@pytest.mark.parametrize(
    "text, prelude, core, coda, tied, n_compute, unique",
    [
        ("24", 24, (), 0, True, 24, 24),
        ("4+8R2+4", 4, (8, 8), 4, True, 24, 16),
        ("3+6R3+3", 3, (6, 6, 6), 3, True, 24, 12),
        ("2+4R2+2", 2, (4, 4), 2, True, 12, 8),
        ("3+5R2+3", 3, (5, 5), 3, True, 16, 11),
        ("4+8+8+4", 4, (8, 8), 4, False, 24, 24),
        ("0+2R3+0", 0, (2, 2, 2), 0, True, 6, 2),
    ],
)
def test_parse(text, prelude, core, coda, tied, n_compute, unique):
    layout = parse_layout(text)
    assert (layout.prelude, layout.core, layout.coda, layout.tied) == (prelude, core, coda, tied)
    assert layout.n_compute == n_compute
    assert layout.unique_layers == unique
    assert str(layout) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("4+8R0+4", "K=0"),
        ("4+0R2+4", "at least 1 layer"),
        ("0", "at least 1 layer"),
        ("4+8R2", "not a valid layout"),
        ("four", "not a valid layout"),
        ("4+8*2+4", "not a valid layout"),
        ("4+0+8+4", "every untied core"),
    ],
)
def test_invalid_layouts_name_the_problem(text, message):
    with pytest.raises(ValueError, match="layout") as err:
        parse_layout(text)
    assert message in str(err.value)
