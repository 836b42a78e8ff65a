"""Spies for the unit tests."""


def spy_results(monkeypatch, module, name):
    """Wrap ``module.name`` (a streamed implementation); the returned list gets, per call, whether it produced a
    result (and not None, handing over to the stacked path)."""
    calls = []
    real = getattr(module, name)

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(module, name, spy)
    return calls
