"""A tiny TransMatcher trained with the graph sampler and pairwise BCE on synthetic_reid
(domain_a) improves cross-domain retrieval (domain_b) well beyond the untrained model."""
from configs import transmatcher
from training import assert_learns_cross_domain, tiny


def test_tiny_transmatcher_gs_learns_cross_domain(synthetic_data_dir, tmp_path):
  config = tiny(transmatcher.get_config(), synthetic_data_dir, width=8, batch_size=32, epochs=1,
                lr_step_epochs=(1,))
  config.model.update(ffn=64, num_layers=2, encoders=1)
  assert_learns_cross_domain(config, tmp_path)
