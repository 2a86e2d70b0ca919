"""The demo world: the seeded shapes world (:mod:`.world`), its evaluator CNN (:mod:`.evaluator`) and the
embedded demo pipeline (:mod:`.model`). Import the submodules; this package imports nothing heavy."""
