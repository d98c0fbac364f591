"""Recipes that train one model against others in the same job: the losses and the exchanges
between models of different parallel shapes (`dpo`: a policy and its frozen reference;
`distill`: a student and its frozen teacher)."""
