"""gmcert's own architectures, registered with timm (``timm.create_model("gmcert_cnn")`` and the
rest), the card's wrapper module and the fitted projection as a module, and the arithmetic modes
torch runs them in. No bound code: the bounds (:mod:`gmcert.bounds`) read these networks, not
the reverse."""
