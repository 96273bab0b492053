"""
The C{twistd infsmtp} plugin.  Everything lives in L{infsmtp._daemon.twistd}; this
package has no C{__init__.py}, so that it merges into Twisted's own
C{twisted.plugins}.
"""

from infsmtp._daemon.twistd import serviceMaker

__all__ = ["serviceMaker"]
