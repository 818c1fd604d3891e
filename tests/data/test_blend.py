"""Blends go through megatron-core's BlendedMegatronDatasetBuilder and GPTDataset."""

import numpy

from megatron_mesh.data.indexed import write_indexed_dataset


def test_weights_025_075_draw_samples_in_that_proportion(tmp_path, megatron_world):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    for name, token in (("a", 5), ("b", 7)):  # every token says which dataset it came from
        write_indexed_dataset(([token] * 60 + [0] for _ in range(400)), tmp_path / name, vocab_size=100)
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=32,
        blend=([str(tmp_path / "a"), str(tmp_path / "b")], [0.25, 0.75]),
        split="100,0,0", path_to_cache=str(tmp_path / "cache"),
        tokenizer=NullTokenizer(100, eod_id=0), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [2000, 0, 0], lambda: True, config).build()
    sources = [int(numpy.bincount(train[i]["tokens"].numpy(), minlength=8)[[5, 7]].argmax()) for i in range(2000)]
    share_a = sources.count(0) / len(sources)
    assert abs(share_a - 0.25) < 0.02, share_a
    assert list((tmp_path / "cache").iterdir()), "index cache not written"
