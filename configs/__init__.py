"""Training recipes: `python -m clip_jax.train --config configs/NAME.py[:ARGS]`.

Each module's `get_config(arg)` parses its `:ARGS` with `clip_jax.config_base.parse_arg`
(an unknown key fails naming the valid ones) and returns a locked-ready ConfigDict built
on `base_config()`. Recipes that extend another import it as a module (`flip` builds on
`clip`'s recipe function), so this folder is a package.
"""
