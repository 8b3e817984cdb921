"""Loading encoders: cards and timm modules (``cards``, weights files in ``state_dicts``), images to
latents with a cache (``encoding``), fitted projections (``projection``) and a card's resize of the
data (``resizing``). gmcert's own architectures are in :mod:`gmcert.networks`, what certifies them
in :mod:`gmcert.bounds`; the old module paths here (``gmcert.encoders.lipschitz`` and the rest)
are those same modules."""
from gmcert.encoders.cards import (CARDS_DIR, Encoder, EncoderCard, card_from_timm, card_from_toml, list_cards,
                                   load_card, load_classifier, load_encoder, map_ordered)

__all__ = ["CARDS_DIR", "Encoder", "EncoderCard", "card_from_timm", "card_from_toml", "list_cards", "load_card",
           "load_classifier", "load_encoder", "map_ordered"]
