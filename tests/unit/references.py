"""Reference implementations the unit tests compare against, when installed."""
import warnings

import pytest

try:  # sd-mecha warns at import about python-Levenshtein (optional speed-up of fuzzywuzzy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sd_mecha
except Exception:  # pragma: no cover - depends on the environment
    sd_mecha = None

needs_mecha = pytest.mark.skipif(sd_mecha is None, reason="sd-mecha not installed")

try:  # meh (sd-meh): its merge methods module imports only torch
    import sd_meh.merge_methods as sd_meh
except Exception:  # pragma: no cover - depends on the environment
    sd_meh = None

needs_meh = pytest.mark.skipif(sd_meh is None, reason="sd-meh not installed")
