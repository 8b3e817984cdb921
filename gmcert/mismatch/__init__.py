"""How far the latents are from the fitted mixture: KL per class with the Kozachenko-Leonenko entropy
(``entropy``), the certified-accuracy bound (``divergence``), sound held-out statements (``bounds``:
Clopper-Pearson certified accuracy, KL lower bounds, cross-entropy) and Mardia's tests
(``normality``). No torch."""
from gmcert.mismatch.divergence import MismatchReport, mardia_test, mismatch_report

__all__ = ["MismatchReport", "mardia_test", "mismatch_report"]
