"""What certifies an encoder, from its stored weights: exact and sound Lipschitz bounds per layer
(conv norms, resize norms), the float64 pass's rounding bound (also over a ball), CLEVER-style
estimates (not certificates) and a contractive DEQ's constants. No card registry: the bounds read
modules, whoever built them."""
