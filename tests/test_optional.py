import pytest

from osdface.errors import InvalidSettingError
from osdface.utils.optional import require_package


def test_require_package_imports_or_names_the_extra():
    assert require_package("json", "dev", "parsing").dumps([1]) == "[1]"
    with pytest.raises(InvalidSettingError) as e:
        require_package("osdface_no_such_module", "face", "reading videos", package="no-such-package")
    assert str(e.value) == "reading videos needs the 'no-such-package' package: pip install 'osdface[face]'"
