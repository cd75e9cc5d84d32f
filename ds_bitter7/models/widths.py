"""The check of an exported config's ``placeholder_units``, shared by every `bitter7_*` type."""

from __future__ import annotations

import re
from typing import Dict, List, Optional


def validate_placeholders(units: Optional[List[str]], n_layers: int, widths: Dict[str, Optional[List[int]]]) -> None:
    """Each entry names a block (``layers.<i>.mlp`` / ``layers.<i>.attn``, ``i < n_layers``) one unit
    wide where ``widths`` (per kind, the config's per-block unit counts; None: not listed) says."""
    for key in units or []:
        found = re.fullmatch(r"layers\.(\d+)\.(mlp|attn)", key) if isinstance(key, str) else None
        if found is None or int(found.group(1)) >= n_layers:
            raise ValueError(f"placeholder_units names {key!r}: expected 'layers.<i>.mlp' or 'layers.<i>.attn' "
                             f"with i < {n_layers}")
        sizes = widths[found.group(2)]
        if sizes is not None and sizes[int(found.group(1))] != 1:
            raise ValueError(f"placeholder_units names {key!r}, which is {sizes[int(found.group(1))]} units wide, "
                             "not 1")
