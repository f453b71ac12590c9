"""bench/device_suite.py end to end at --tiny sizes on the CPU: every section writes its records,
each with its measurements finite and positive, and the PyTorch transcriptions of the official
scorers agree with jaxreid's scores."""
import importlib.util
import json
import math

import pytest

from conftest import ROOT

TIMES = ("first_s", "wall_s")
EXPECTED = {  # (section, name) → keys that must be finite and > 0
    ("qaconv", "jaxreid_float32"): TIMES + ("pairs_per_s", "fraction_of_bf16_peak", "pairs"),
    ("qaconv", "jaxreid_bfloat16"): TIMES + ("pairs_per_s", "fraction_of_bf16_peak", "pairs"),
    ("qaconv", "official_v2.1_logic_torch"): TIMES + ("pairs_per_s", "fraction_of_bf16_peak"),
    ("transmatcher", "jaxreid_float32"): TIMES + ("pairs_per_s",),
    ("transmatcher", "jaxreid_bfloat16"): TIMES + ("pairs_per_s",),
    ("transmatcher", "torch_decoder_float32"): TIMES + ("pairs_per_s",),
    ("train", "jaxreid_qaconv_gs_step"): TIMES + ("images_per_s", "step_ms", "batch"),
    ("train", "jaxreid_qaconv_gs_step_fed"): ("images_per_s", "resident_images_per_s", "batch",
                                              "steps", "host_cores"),
    ("train", "official_v2.1_step_torch"): TIMES + ("images_per_s", "step_ms", "loss",
                                                    "jaxreid_speedup"),
    ("msmt_eval", "jaxreid_qaconv_streamed"): (
        "query_extraction_s", "scoring_only_s", "streamed_encoding_and_scoring_s", "metrics_s",
        "scoring_pairs_per_s", "query_images_per_s", "peak_rss_mb", "P", "G", "chunk"),
    **{("memory", f"jaxreid_{method}_{size}"): (
        "query_extraction_s", "probes_mb", "chunk_maps_mb", "score_matrix_mb", "peak_rss_mb",
        "projected_scoring_s", "gallery_done")
       for method in ("qaconv_gs", "transmatcher", "kpm") for size in ("market", "msmt17")},
    ("nformer", "jaxreid_nformer_refine"): TIMES + ("items_per_s", "N"),
    ("kpm", "jaxreid_kpm_scoring"): TIMES + ("pairs_per_s",),
    ("pat", "jaxreid_pat_encode"): TIMES + ("images_per_s",),
}


def test_tiny_suite_writes_every_record(tmp_path):
  spec = importlib.util.spec_from_file_location("device_suite", ROOT / "bench/device_suite.py")
  suite = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(suite)
  out = tmp_path / "suite.jsonl"
  assert suite.main(["--tiny", "--reps", "1", "--out", str(out)]) == 0
  import torch
  assert torch.is_grad_enabled()        # the PyTorch baselines leave autograd as they found it
  records = [json.loads(line) for line in out.read_text().splitlines()]
  by_name = {(r["section"], r["name"]): r for r in records}
  assert len(by_name) == len(records) and set(by_name) == set(EXPECTED), sorted(by_name)
  for key, fields in EXPECTED.items():
    record = by_name[key]
    assert {"device", "backend", "num_devices"} <= set(record), key
    for field in fields:
      value = record[field]
      assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, field,
                                                                                     value)
  official = by_name[("qaconv", "official_v2.1_logic_torch")]
  assert official["max_abs_diff_vs_jaxreid_f32"] <= 1e-4 * max(1.0, official["max_abs_score"])
  assert by_name[("transmatcher", "torch_decoder_float32")]["max_abs_diff_vs_jaxreid_f32"] < 1e-4
  for (section, _), record in by_name.items():
    if section == "memory":   # one chunk of maps, all probes, a [P, G] float32 matrix
      per_image = record["map_bytes"]
      assert per_image in (2 * math.prod(record["map"]), 4 * math.prod(record["map"]))
      mb = lambda n: pytest.approx(n / 2**20, rel=1e-3)     # records keep 4 significant digits
      assert record["chunk_maps_mb"] == mb(record["chunk"] * per_image)
      assert record["probes_mb"] == mb(record["P"] * per_image)
      assert record["score_matrix_mb"] == mb(4 * record["P"] * record["G"])
      assert record["gallery_done"] == record["G"] == 150
  fed = by_name[("train", "jaxreid_qaconv_gs_step_fed")]
  assert fed["input_bound"] == (fed["images_per_s"] < 0.95 * fed["resident_images_per_s"])
  msmt = by_name[("msmt_eval", "jaxreid_qaconv_streamed")]
  assert (msmt["P"], msmt["G"]) == (40, 150) and msmt["chunk"] % msmt["batch"] == 0
