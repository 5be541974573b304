"""The README's figures are printed from the result files they cite, not copied by hand."""

import json
from pathlib import Path

import pytest

from benchmarks.moe_layer import markdown_table
from benchmarks.throughput import markdown_table as throughput_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("records", ["moe_layer_cpu_amd_epyc.json", "moe_layer_cpu_amd_epyc_avx2.json",
                                     "moe_layer_cpu_amd_epyc_zen1.json"])
def test_readme_layer_table_is_the_one_its_records_print(records):
    records = json.loads((ROOT / "docs/results" / records).read_text())
    assert markdown_table(records) in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("run", ["throughput_cpu_amd_epyc_avx2_b936b08_allocators.json",
                                 "throughput_cpu_amd_epyc_zen1_c345bfd.json"])
def test_readme_throughput_table_is_the_one_its_run_prints(run):
    records = json.loads((ROOT / "docs/results" / run).read_text())
    assert throughput_table(records) in (ROOT / "README.md").read_text()
