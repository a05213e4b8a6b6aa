import numpy as np

from jaxlm.data.objectives import SpecialIds, bert_example, mask_tokens, pack_pair, truncate_pair

SP = SpecialIds(pad=0, cls=2, sep=3, mask=4, special=frozenset({0, 1, 2, 3, 4}), vocab_size=1000)


def test_mlm_masking_statistics():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 1000, size=200_000)
  maskable = np.ones_like(ids, bool)
  maskable[::7] = False  # stand-ins for special tokens
  inputs, pos, labels, w = mask_tokens(ids, maskable, rng, SP, num_predictions=40_000)
  n = int(w.sum())
  assert abs(n / maskable.sum() - 0.15) < 0.002
  pos, labels = pos[:n], labels[:n]
  assert maskable[pos].all() and (labels == ids[pos]).all()
  became_mask = (inputs[pos] == SP.mask).mean()
  kept = (inputs[pos] == ids[pos]).mean()
  assert abs(became_mask - 0.8) < 0.01 and abs(kept - 0.1 - 0.1 / 995) < 0.01
  randomized = inputs[pos][(inputs[pos] != SP.mask) & (inputs[pos] != ids[pos])]
  assert randomized.min() >= 5  # random replacements never draw special tokens
  untouched = np.ones_like(ids, bool)
  untouched[pos] = False
  assert (inputs[untouched] == ids[untouched]).all()


def test_pair_layout_and_special_tokens_never_masked():
  rng = np.random.default_rng(1)
  a, b = list(range(10, 40)), list(range(50, 70))
  ids, types, attn = pack_pair(a, b, 64, SP)
  assert ids[0] == SP.cls and ids[31] == SP.sep and ids[52] == SP.sep and ids[53] == SP.pad
  assert (types[:32] == 0).all() and (types[32:53] == 1).all() and attn.sum() == 53
  for seed in range(50):
    ex = bert_example(a, b, 1, np.random.default_rng(seed), SP, max_seq_len=64,
                      objective="mlm+nsp")
    n = int(ex["masked_weights"].sum())
    assert n == round(50 * 0.15)
    assert not np.isin(ids[ex["masked_positions"][:n]], list(SP.special)).any()


def test_truncate_pair():
  rng = np.random.default_rng(0)
  a, b = truncate_pair(list(range(100)), list(range(10)), 50, rng)
  assert len(a) + len(b) == 50 and len(b) == 10
