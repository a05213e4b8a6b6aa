import numpy as np
import pytest

from jaxlm.data.objectives import (SpecialIds, bert_example, mask_tokens, pack_pair,
                                   random_spans_noise_mask, raw_length_for,
                                   span_corruption_example, span_lengths, truncate_pair,
                                   uncorrupt)

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
    ex = bert_example(a, b, 1, np.random.default_rng(seed), SP, max_seq_len=64, mlm=True,
                      classify=True)
    n = int(ex["masked_weights"].sum())
    assert n == round(50 * 0.15)
    assert not np.isin(ids[ex["masked_positions"][:n]], list(SP.special)).any()


def test_truncate_pair():
  rng = np.random.default_rng(0)
  a, b = truncate_pair(list(range(100)), list(range(10)), 50, rng)
  assert len(a) + len(b) == 50 and len(b) == 10


# ---- T5 span corruption ------------------------------------------------------------------
SENTINELS = list(range(999, 899, -1))  # <extra_id_0> is the last id, as in T5


def test_noise_mask_density_and_span_lengths():
  rng = np.random.default_rng(0)
  noise = np.concatenate([random_spans_noise_mask(568, 0.15, 3.0, rng) for _ in range(200)])
  assert abs(noise.mean() - 0.15) < 0.002
  starts = noise & ~np.concatenate([[False], noise[:-1]])
  assert abs(noise.sum() / starts.sum() - 3.0) < 0.05
  # Every row starts clean and ends inside a span (clean, noise, clean, noise, ...).
  one = random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(1))
  assert not one[0] and one[-1] and one.sum() == 15


def test_span_lengths_match_t5():
  # T5's span-corruption preprocessing: 568 raw tokens -> 512 inputs and 114 targets.
  assert raw_length_for(512, 0.15, 3.0) == 568
  assert span_lengths(568, 0.15, 3.0) == (512, 114)


@pytest.mark.parametrize("seed", range(20))
def test_span_targets_reconstruct_the_original(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 200))
  tokens = rng.integers(5, 800, size=n)
  enc, dec = span_lengths(n, 0.15, 3.0)
  ex = span_corruption_example(tokens, rng, sentinels=SENTINELS, eos=1, pad=0,
                               decoder_start=0, encoder_len=enc + 3, decoder_len=dec + 2)
  n_in, n_out = int(ex["attention_mask"].sum()), int(ex["loss_weights"].sum())
  assert (n_in, n_out) == (enc, dec)
  inputs, targets = ex["input_ids"][:n_in], ex["targets"][:n_out]
  assert inputs[-1] == 1 and targets[-1] == 1 and (ex["input_ids"][n_in:] == 0).all()
  # Sentinels appear in order, once each, in both; targets open with the first one.
  used = [t for t in inputs if t in SENTINELS]
  assert used == SENTINELS[:len(used)] == [t for t in targets if t in SENTINELS]
  assert targets[0] == SENTINELS[0]
  assert uncorrupt(inputs[:-1], targets[:-1], SENTINELS) == tokens.tolist()
  # Teacher forcing: the decoder reads the targets shifted right behind the start id.
  assert ex["decoder_input_ids"][0] == 0
  np.testing.assert_array_equal(ex["decoder_input_ids"][1:], ex["targets"][:-1])
