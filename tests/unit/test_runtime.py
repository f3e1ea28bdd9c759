"""Library entry points run on the Ray the program joined; only the entry points (the CLI) start it."""

import pytest

from heygen_ray.runtime import require_ray


def test_a_library_entry_point_without_ray_names_itself_and_the_fix(monkeypatch):
    import ray

    # The suite's shared Ray may be up by the time this runs: stand for a process that never joined one.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"serve\.deploy: Ray is not initialised; call heygen_ray\.runtime\.init_ray"):
        require_ray("serve.deploy")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    require_ray("serve.deploy")  # joined: nothing to say
