"""Methods of bag-of-words kernel classifiers (relprop.bow; models from `relprop fit-bow`)."""

from __future__ import annotations

from relprop.methods.registry import register

BOW_METHODS = ("bow-lrp", "bow-occlusion")


def _build(model, name, options):
    from relprop.bow.explainer import get_bow_method

    return get_bow_method(name, model)


for _name in BOW_METHODS:
    register(_name, _build)
