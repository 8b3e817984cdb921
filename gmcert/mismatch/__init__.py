"""How far the latents are from the fitted mixture: KL per class with the Kozachenko-Leonenko entropy
(``entropy``), Mardia's tests and the certified-accuracy bound (``divergence``). No torch."""
from gmcert.mismatch.divergence import MismatchReport, mardia_test, mismatch_report

__all__ = ["MismatchReport", "mardia_test", "mismatch_report"]
