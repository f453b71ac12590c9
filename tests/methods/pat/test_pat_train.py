"""The synthetic default of configs/pat.py (a tiny ViT with part tokens, CSL and PSD) learns on
synthetic_reid: trained on domain_a, its mAP on domain_a's disjoint test ids is at least twice
the untrained model's."""
from configs import pat
from training import tiny, untrained_and_trained


def test_tiny_pat_learns(synthetic_data_dir, tmp_path):
  config = tiny(pat.get_config(), synthetic_data_dir, batch_size=32)   # 6 epochs
  assert config.dataset.test == "synthetic_reid/domain_a"
  u, t, trained = untrained_and_trained(config, tmp_path)
  assert trained["step"] == config.train.epochs * 18 and t["mAP"] >= 2 * u["mAP"], (u, t)
