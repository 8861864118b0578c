"""The study: the single record of a search (DESIGN section 5), in an Optuna RDB storage.

`storage` opens and checks storages, `contents` reads back what `kdsearch run` recorded,
`drivers` tells live searches from stopped ones, and `record` writes a driver's trials.
"""

import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)
