"""Library entry points run on the Ray the program joined; only the entry points (the CLI) start it."""

import os

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


def test_relative_paths_resolve_under_the_storage_root_and_absolute_ones_stay(monkeypatch, tmp_path):
    from heygen_ray import fsutil
    from heygen_ray.runtime import use_storage

    monkeypatch.delenv(fsutil.STORAGE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert fsutil.absolute("runs/x") == str(tmp_path / "runs" / "x")  # no root: the current directory
    root = tmp_path / "store"
    assert use_storage(str(root)) == str(root) and root.is_dir()  # created, checked, set for this process
    assert fsutil.absolute("runs/x") == str(root / "runs" / "x")
    assert fsutil.absolute("") == str(root)
    assert fsutil.absolute("/elsewhere/x") == "/elsewhere/x" and fsutil.absolute("s3://b/x") == "s3://b/x"
    assert use_storage() == str(root)  # the environment's root, checked again
    assert not [p for p in root.iterdir()]  # the write check leaves nothing behind


def test_a_storage_root_that_cannot_be_used_fails_naming_it(monkeypatch, tmp_path):
    from heygen_ray import fsutil
    from heygen_ray.config import ConfigError
    from heygen_ray.runtime import use_storage

    monkeypatch.delenv(fsutil.STORAGE_ENV, raising=False)
    assert use_storage() is None  # none set: paths stay relative to the current directory
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"storage: cannot write to the storage root '.*a_file/root'"):
        use_storage(str(blocker / "root"))
    monkeypatch.setenv(fsutil.STORAGE_ENV, str(blocker / "root"))
    with pytest.raises(ConfigError, match=r"\$HEYGEN_RAY_STORAGE: cannot write"):
        use_storage()
    with pytest.raises(ConfigError, match=r"storage: 's3://bucket/x': the storage root must be a local or shared"):
        use_storage("s3://bucket/x")
    assert os.environ[fsutil.STORAGE_ENV] == str(blocker / "root")  # a failed check sets nothing
