"""The Processor's text pipeline: OpenAI request -> token ids -> engine -> text.

transformers is imported only when a Preprocessor is built, so importing this
package stays cheap in the Frontend.
"""

from app.preprocess.postprocessor import Postprocessor, StopStringMatcher, postprocess_stream
from app.preprocess.preprocessor import Preprocessor

__all__ = [
    "Postprocessor",
    "Preprocessor",
    "StopStringMatcher",
    "postprocess_stream",
]
