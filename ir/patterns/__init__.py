"""The pattern library every pass uses: op classes, the weight view, the Q/DQ view, the residual
matcher, an IR builder that owns fresh names, and a rewrite driver.

Passes match structure through these, never through hand-written walks with op sets of their own.
"""
