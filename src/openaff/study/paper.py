"""The paper's numbers (AFF.md section 4): Tables 3, 4 and 6, top-1 on CIFAR-100 with the 20 coarse labels;
long skip: mIoU."""

from __future__ import annotations

TABLE_FUSIONS: dict[int, tuple[str, ...]] = {
    3: ("aff_global_global", "aff_local_local", "aff"),
    4: ("add", "concat", "ms_gau", "ms_se", "ms_sa", "aff", "iaff"),
    6: ("half_aff", "concat_aff", "aff", "recursive_aff", "iaff"),
}


_T4_AFF = {"same-layer": (.756, .784, .794, .801), "short-skip": (.763, .804, .816, .826),
           "long-skip": (.924, .935, .939, .944)}


# table -> scenario -> fusion -> values for b = 1, 2, ... (None: not reported)
PAPER: dict[int, dict[str, dict[str, tuple[float | None, ...]]]] = {
    4: {
        "same-layer": {"add": (.720, .753, .771, .782), "concat": (.725, .749, .772, .779),
                       "ms_gau": (.751, .774, .788, .795), "ms_se": (.752, .780, .790, .798),
                       "ms_sa": (.756, .779, .790, .798), "aff": _T4_AFF["same-layer"],
                       "iaff": (.774, .801, .808, .814)},
        "short-skip": {"add": (.740, .786, .797, .808), "concat": (.742, .782, .793, .798),
                       "ms_gau": (.766, .803, .815, .819), "ms_se": (.765, .799, .814, .820),
                       "ms_sa": (.761, .801, .814, .822), "aff": _T4_AFF["short-skip"],
                       "iaff": (.772, .807, .822, None)},
        "long-skip": {"add": (.895, .920, .925, .928), "concat": (.897, .909, .925, .939),
                      "ms_gau": (.917, .926, .937, .941), "ms_se": (.915, .929, .940, .940),
                      "ms_sa": (.920, .932, .938, .941), "aff": _T4_AFF["long-skip"],
                      "iaff": (.927, .938, .945, .953)},
    },
    3: {  # Global+Local is the AFF row of Table 4
        "same-layer": {"aff_global_global": (.735, .766, .775, .789), "aff_local_local": (.746, .771, .785, .787),
                       "aff": _T4_AFF["same-layer"]},
        "short-skip": {"aff_global_global": (.754, .796, .811, .821), "aff_local_local": (.754, .794, .808, .814),
                       "aff": _T4_AFF["short-skip"]},
        "long-skip": {"aff_global_global": (.911, .923, .936, .939), "aff_local_local": (.895, .919, .921, .924),
                      "aff": _T4_AFF["long-skip"]},
    },
    6: {"short-skip": {"half_aff": (.759, .798, .813), "concat_aff": (.765, .792, .817), "aff": (.764, .799, .816),
                       "recursive_aff": (.764, .797, .812), "iaff": (.772, .807, .822)}},
}


def paper_number(fusion: str, scenario: str, b: int, table: int | None = None) -> tuple[float | None, int | None]:
    """The paper's value for a cell, as a fraction, and the table it is from (``(None, None)`` if none).

    Args:
        fusion: fusion type name.
        scenario: scenario name (the paper's column group).
        b: blocks per stage.
        table: the table to look in first; then Tables 4, 3 and 6 (Table 6's AFF row differs from Table 4's).
    """
    for t in dict.fromkeys([table, 4, 3, 6]):
        values = PAPER.get(t, {}).get(scenario, {}).get(fusion) if t is not None else None
        if values is not None:
            return (values[b - 1] if 1 <= b <= len(values) else None), t
    return None, None
