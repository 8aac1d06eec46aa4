"""The checkers of the model: the exhaustive explorer, Hypothesis, Z3 (induction and bounded model
checking), SPIN on Promela generated from the declarations, the verdict table and the mutant matrix
(docs/model.md, docs/proofs.md).

The declarations they check live one level up, in pipeproof.model; nothing here declares a
transition.
"""
