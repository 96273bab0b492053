"""
Handlers named as 'package.module:function' strings by the interop tests.
"""
