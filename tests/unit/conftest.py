"""Fixtures shared by unit-test modules."""

from __future__ import annotations

import pytest

from fabricd.config import load_job_spec
from fabricd.job import open_sources

from ..conftest import write_job


@pytest.fixture(scope="module")
def specs(tiny_corpus, tmp_path_factory):
    """The tiny corpus's job, plain and with composition (windows of 4), and its indexes (plan-change tests)."""
    d = tmp_path_factory.mktemp("plan-changes")
    plain = load_job_spec(write_job(d / "plain.toml", tiny_corpus, name="plain", dp_size=2, samples_per_step=16))
    text = (d / "plain.toml").read_text().replace('compression = "lz4"',
                                                    'compression = "lz4"\ncompose = "outliers"\nmax_delay_steps = 3')
    (d / "composed.toml").write_text(text.replace('name = "plain"', 'name = "composed"'))
    composed = load_job_spec(d / "composed.toml")
    return {"plain": plain, "composed": composed, "indexes": open_sources(plain)}
