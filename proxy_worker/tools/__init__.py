"""Offline tools an operator runs before serving: holdout traces read and tokenized, the gradient g
of the proxy's loss on them written as a gradient file, and ε calibration. They use ``core`` only;
``antidistill gradient`` and ``antidistill calibrate`` run them."""
