# Standard nbdev setup: everything is read from settings.ini.

from configparser import ConfigParser
import setuptools


config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']
licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], license=licenses[cfg['license']][0],
    description=cfg['description'], author=cfg['author'], author_email=cfg['author_email'],
    url=cfg['git_url'], packages=setuptools.find_packages(include=['layerprune', 'layerprune.*']),
    include_package_data=True, install_requires=cfg.get('requirements', '').split(),
    python_requires='>=' + cfg['min_python'], zip_safe=False,
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f'{cfg["lib_path"]}={cfg["lib_path"]}._modidx:d']},
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
)
