"""Encoders and what certifies them: cards and timm modules (``cards``), images to latents with a
cache (``encoding``), fitted projections (``projection``), sound Lipschitz bounds (``lipschitz``,
exact layer norms in ``convnorm``), CLEVER estimates (``clever``), the rounding-error bound of the
certifying pass (``rounding``), and gmcert's own architectures (``small``, ``lipconv``, ``cdeq``,
``deq``)."""
from gmcert.encoders.cards import (CARDS_DIR, Encoder, EncoderCard, card_from_timm, card_from_toml, list_cards,
                                   load_card, load_classifier, load_encoder, map_ordered)

__all__ = ["CARDS_DIR", "Encoder", "EncoderCard", "card_from_timm", "card_from_toml", "list_cards", "load_card",
           "load_classifier", "load_encoder", "map_ordered"]
