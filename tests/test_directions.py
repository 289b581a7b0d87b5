"""The study's directions at a tiny budget (the study, Figs. 2 and 6): fewer images and unique labels memorize more.

Each case trains the 8-channel digits DDPM++ for 600 steps and scores 200 samples: about half a
minute of CPU time per training. Measured on this setup (the study's data rules, seed 0, torch 2.13
CPU): |D| = 16 memorizes 0.735 of its samples and |D| = 64 0.005; with one label per image |D| = 64
memorizes 0.535.
"""

import functools

import pytest

import memdiff

pytestmark = pytest.mark.slow

@functools.lru_cache
def ratio(n, labels):
    """Memorization ratio of a tiny trained model on n digits under a label mode (cached)."""
    images, classes = memdiff.load_dataset('digits')
    cfg = memdiff.EMMConfig(model_channels=8, labels=labels, samples=200,
                            train=memdiff.TrainConfig(train_steps=600, snapshots=1))
    return max(s['ratio'] for s, _, _ in memdiff.measure(images, classes, n, cfg))

def test_a_smaller_training_set_memorizes_more():
    """At the same model and training budget, 16 images are memorized far more than 64."""
    assert ratio(16, 'none') >= 0.6
    assert ratio(16, 'none') > ratio(64, 'none') + 0.3

def test_unique_labels_memorize_more_than_no_labels():
    """One class label per image raises memorization at a size where the unconditional model fails."""
    assert ratio(64, 'unique') > ratio(64, 'none') + 0.2
